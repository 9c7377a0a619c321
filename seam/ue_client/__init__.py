"""The UE client: runs the head blocks locally and streams hidden states to an edge server."""
