"""The Ray serving runtime (request queue, live reconfiguration, RPC); see the runtime issue."""
