"""One module per tab; each ``build(services, session)`` lays out its tab and wires its events."""
