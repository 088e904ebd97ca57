"""Registers the markers used by the model-factory self-checks."""


def pytest_configure(config):
    config.addinivalue_line(
        "markers",
        "sdxl: builds the full SDXL UNet in memory (about 5 GB RSS, 1 min on CPU); "
        "deselect with -m 'not sdxl'; never run two at once")
