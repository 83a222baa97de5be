"""Reading exports back: the reader (tensors in their stored dtype, token batches for training), the
``datasets`` format, and the report. Imports only ``files`` and the contracts below it."""
