from dist_ortho.train.cli import main

main()
