"""The real photos the suite trains and predicts on: ``python tests/real_photos.py`` prints their folder.

``CATDOG_REAL_DATA`` when set; otherwise the checksum-verified cats_and_dogs_filtered download that ``make demo``
uses, fetched if needed, seen in the tests' layout (``train/cat/cat.0.jpg``, ``val/dog/dog.2000.jpg``) through hard
links (data_prep/fetch.py ``photos_by_split``). Exit 2 with one line when there are no photos to be had.
"""

from __future__ import annotations

import sys

from data_prep.fetch import FetchError, photos_by_split

if __name__ == "__main__":
    try:
        print(photos_by_split())
    except FetchError as e:
        print(f"real photos: {e}", file=sys.stderr)
        sys.exit(2)
