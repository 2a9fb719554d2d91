"""The controller: target state versus running state for every deployment, reconciled
in one loop (starts, stops, replacements, health checks, autoscaling), and the status it
reports."""
