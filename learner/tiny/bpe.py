"""The built-in byte-level BPE tokenizer: 512 tokens trained here, deterministically, on a fixed corpus.

The models of the built-in tasks (learner.tasks.addition, learner.tasks.longtail) use it, wrapped
by learner.tiny.model.build_bpe_tokenizer. Only the `tokenizers` library is imported, so the tasks'
reward modules can use these constants without loading torch.
"""

from __future__ import annotations

from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, trainers

VOCAB_SIZE = 512
MAX_NUMBER_TOKEN = 98  # 0..98 (every sum of two numbers below 50) are single tokens
NOUNS = ("cat", "dog", "sun", "tree", "bird", "fish", "star", "ship", "apple", "house", "river", "cloud")
# Common English words: enough text for the trainer to fill the vocabulary with merges.
WORDS = (
    "the of and to in is it you that he was for on are with as his they be at one have this from or had by "
    "word but what some we can out other were all there when up use your how said an each she which do their "
    "time if will way about many then them write would like so these her long make thing see him two has look "
    "more day could go come did number sound no most people my over know water than call first who may down "
    "side been now find any new work part take get place made live where after back little only round man year "
    "came show every good me give our under name very through just form sentence great think say help low line "
    "turn cause much mean before move right boy old too same tell does set three want air well also play small "
    "end put home read hand large spell add even land here must big high such follow why ask change went light "
    "kind off need house try again point world near build earth head stand own page should answer"
).split()


def corpus() -> list[str]:
    """The fixed training text: WORDS, sums, counting sequences and numbered lists of NOUNS."""
    words = [" ".join(WORDS[i: i + 12]) for i in range(0, len(WORDS), 12)]
    sums = [f"{a}+{b}={a + b}" for a in range(50) for b in range(50)]
    counts = [f"count {a} to {MAX_NUMBER_TOKEN}: " + " ".join(map(str, range(a, MAX_NUMBER_TOKEN + 1)))
              for a in range(0, MAX_NUMBER_TOKEN, 7)]
    lists = [f"repeat {noun} 40:" + "".join(f"\n{k} {noun}" for k in range(40, 0, -1)) for noun in NOUNS]
    return words + sums + counts + lists


def train_bpe(special_tokens: list[str]) -> Tokenizer:
    """Train the tokenizer: ids 0.. for `special_tokens`, then the 256 bytes, then merges up to VOCAB_SIZE.

    A run of digits is split off before the merges, so a number is the same tokens wherever it
    stands (" 57" is " ", "57"); every number up to MAX_NUMBER_TOKEN is one token, as is " cat" for
    each of NOUNS (checked). Any text encodes: there is no unknown token. Deterministic: every
    build gives the same tokenizer.
    """
    backend = Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.Split(Regex(r"\d+"), behavior="isolated"), pre_tokenizers.ByteLevel(add_prefix_space=False)])
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=VOCAB_SIZE, special_tokens=special_tokens,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    backend.train_from_iterator(corpus(), trainer)
    single = [str(n) for n in range(MAX_NUMBER_TOKEN + 1)] + [f" {noun}" for noun in NOUNS]
    split = [text for text in single if len(backend.encode(text).ids) != 1]
    if backend.get_vocab_size() != VOCAB_SIZE or split:
        raise RuntimeError(f"BPE training made {backend.get_vocab_size()} tokens (want {VOCAB_SIZE}) "
                           f"and split {split} (want single tokens)")
    return backend
