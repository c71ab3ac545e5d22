"""One run's lifecycle: parameters, layout, durable state, shards through the gate, progress."""
