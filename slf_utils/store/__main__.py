from slf_utils.store.cli import main

main()
