"""Reports: per-site records and cost comparisons rendered as tables, Markdown and JSON, the JSON schema, and the
per-site eligibility table of a dry run."""
