"""``python -m actlightning.report OUTPUT_DIR``: a picture of an export (see ``actlightning.read.report``)."""

from actlightning.read.report import main

if __name__ == "__main__":
    main()
