"""Watching Bedrock: CloudWatch reads, alert rules, alarms, Prefect events and automations."""
