"""The learner's side of the wire: the hub interface and its implementations (rollouts over
ZeroMQ, a follower rank), work grants, a step's samples and the weight fan-out."""
