from tlbuild.cli import main

main()
