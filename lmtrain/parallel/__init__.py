"""Device meshes, multi-host start-up and the logical-axis sharding rules."""
