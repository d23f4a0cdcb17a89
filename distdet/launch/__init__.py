"""Launch helpers: turning a cluster job's environment into an ``accelerate launch`` command."""
