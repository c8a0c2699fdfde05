from .cli import main

if __name__ == "__main__":  # not in the spawned --compile-only workers, which import this as __mp_main__
    main()
