"""Fleets of emulated edge devices for load tests (Ray-free core): the fleet spec, real-time asyncio
devices that drive the real draft and a real transport, and the load-test report. Ray actors that host
shards of a fleet live in `deployments/fleet.py`."""
