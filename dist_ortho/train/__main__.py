from dist_ortho.train.cli import main

if __name__ == "__main__":  # importing it (a docs build, an import walk) runs nothing
    main()
