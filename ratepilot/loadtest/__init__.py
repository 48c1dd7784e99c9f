"""`ratepilot loadtest`: load scenarios as YAML data, played open-loop against any HTTP endpoint or exported for k6."""
