"""protege's command line: builds models, serves, runs the demo and the benchmark."""
