"""Programs of the peers `python -m bench --stages peers` compares localflow with.

Each runs in its peer's own venv (`make bench` creates them under bench/.peers/), so it imports
nothing from localflow or the benchmark; its settings come as one JSON argument.
"""
