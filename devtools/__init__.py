"""Developer tooling shared by the tests, bench/ and the Makefile: the gunicorn launcher and HTTP
helpers, the marker-section writer of README.md and docs/*.md, the settings documentation generator,
the random-weight models (synthetic.py) and the fault points tests arm.

app/ and monitoring/ never import this package (tests/test_devtools.py checks it), and the image's
runtime does not contain it (its model stage uses synthetic.py to build CI's random-weight model).
"""
