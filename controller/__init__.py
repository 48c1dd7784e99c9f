"""The control loop: Prometheus metrics -> policy -> safety engine -> Redis rate table, with an admin API."""
