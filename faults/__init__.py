"""The fault-injection suite (`make faults`, `python -m faults.run`): docs/faults.md."""
