"""Split fine-tuning: planning how UEs and edge servers share the work and the radio while adapters train."""
