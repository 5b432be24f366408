"""The Ray runtime: the cluster, devices, the resource plan, the trial engine, measuring tasks,
progress lines and tracking. Only this package and the stages import Ray."""
