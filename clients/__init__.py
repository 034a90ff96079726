"""Python client and the `keepclip` command line."""
