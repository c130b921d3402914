

def pytest_collection_modifyitems(config, items):
    """Fast unit tests first, the slow end-to-end tests last."""
    items.sort(key=lambda item: item.get_closest_marker("e2e") is not None)
