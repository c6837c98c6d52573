"""The edge side (Ray-free, deterministic for a seed): device profiles, wireless channels, energy,
and FlexSpec's channel-aware choice of draft length K. Nothing here talks to a real network."""
