"""ftte-agent: the device process of the FTTE fleet.

It serves one device: loads the fleet key and the local data, advertises itself over mDNS,
accepts authenticated hub connections, trains the tasks it is given with the engine and sends
back encoded deltas (never data). See docs/agent.md.

Modules: ``cli`` (the command), ``server`` (connections and tasks), ``state`` (the state dir),
``advertise`` (mDNS), ``device`` (memory budget, speed benchmark, host facts).
"""
__all__ = ["__version__"]

__version__ = "0.1.0"
