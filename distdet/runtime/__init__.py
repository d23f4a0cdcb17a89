"""The runtime every multi-process command sits on: one Accelerator constructor (device,
mixed precision, bounded collective timeout, launch checks), cross-rank agreement, stop
signals and process-group teardown."""
