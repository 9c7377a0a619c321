"""The UE as an OpenAI-compatible HTTP endpoint (``ue_client serve``): apps talk to this device as to any local
model server, and every request is split with the edge behind it."""
