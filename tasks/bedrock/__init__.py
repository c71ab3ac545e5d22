"""Facts about Amazon Bedrock: model families, and (next) the catalog, statuses and error codes."""
