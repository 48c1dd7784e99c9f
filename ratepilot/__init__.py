"""The `ratepilot` command: dispatches subcommands to the packages that own them."""
