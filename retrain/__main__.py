from retrain.cli.retrain import run

run()
