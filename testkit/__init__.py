"""Test and benchmark helpers, kept out of the product packages: hand-made servable tasks (`testkit.tasks`) and free
ports for throwaway servers (`testkit.net`). Nothing in backbone/, prompts_store/, training/, service/ or clients/
imports this package."""
