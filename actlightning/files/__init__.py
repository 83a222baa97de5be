"""Files of an export: where they live (a folder or a bucket), their schema, the manifest, shard files
and the direct Parquet writer. Imports none of the stages above it."""
