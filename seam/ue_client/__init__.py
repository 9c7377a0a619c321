"""The UE client: runs the head blocks locally, streams hidden states to an edge server, probes the link and
moves the split as its policy decides; the ``ue_client`` command."""
