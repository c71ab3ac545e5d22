"""The data path: sources, preprocess, sharding, the plan, merge and the exactly-once check."""
