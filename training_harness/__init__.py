"""The shared harness behind the four training scripts: data, models registry, arguments, the loop."""
