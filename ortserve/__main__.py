from ortserve.cli import main

main()
