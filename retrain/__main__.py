from retrain.cli import run

run()
