"""Developer tooling shared by the tests, bench/ and the Makefile: the one library both suites and
benchmarks import (bench/ never imports tests/, and tests/ import nothing of bench's but the script a
test is about; tests/test_layout.py checks both).

  gunicorn, http   the gunicorn launcher and HTTP helpers
  project          the flask CLI in a subprocess, tier environments, the bench's synthetic models,
                   a throwaway app's settings
  cgroups          memory and CPU cgroups for a measured server
  sampler          memory of a server's process tree over time; measured() runs a server under it
  sharing          memory of N processes loading one model artifact
  synthetic        random-weight models
  markers, docs    the marker-section writer of README.md and docs/*.md, the settings documentation
  faultpoints      the fault points tests arm

app/ and monitoring/ never import this package (tests/test_devtools.py checks it), and the image's
runtime does not contain it (its model stage uses synthetic.py to build CI's random-weight model).
"""
