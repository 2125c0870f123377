from megatron_default_moe.check.cli import main

if __name__ == "__main__":
    main()
