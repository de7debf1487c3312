"""Ray Tune sweeps over stemqa stages: search spaces (`space`), the Tuner (`sweep`), tables/plots/best config
(`results`)."""
from stemqa.tune.space import Space, SweepConfig, load_space

__all__ = ["Space", "SweepConfig", "load_space"]
