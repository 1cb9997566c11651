"""Model implementations. A model takes the Hugging Face config, reads attention metadata from the
forward context, and maps checkpoint weight names onto its own (stacked qkv, gate_up) in `load_weights`.
It never reaches the scheduler, the engine or the server.
"""
