"""Developer tooling shared by the tests, bench/ and the Makefile: the gunicorn launcher and HTTP
helpers, the marker-section writer of README.md and docs/*.md and the settings documentation generator.

app/ and monitoring/ never import this package (tests/test_devtools.py checks it), and the image
does not contain it.
"""
