"""AWS plumbing: boto3 clients, S3 storage, job create and poll, on-demand calls, IAM policies."""
