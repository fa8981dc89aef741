"""Prefect glue: the pipeline flow, its served deployment, and building blocks for a team's own flows.

Nothing in the core imports this package; it imports the stages and the tracking package.
"""
