from label_image.cli import run

run()
