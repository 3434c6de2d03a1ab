"""The embed job (`featx embed` / `featx refresh`), read top to bottom like a recipe: ``job`` (the run, from
lease to commit), ``plan`` (shards -> pieces, what changed), ``stream`` (the Ray Data pass and the carry-over
tasks), ``isolate`` (quarantine of records that crash their worker), ``tracker`` (parts collected and
journalled per piece) and ``report`` (the run report, counted from the parts)."""
