# bash completion for aigisctl: commands, options, and plugin names and skill paths asked from
# the running core (`aigisctl _complete plugins|skills`; nothing is offered when it is down).

_aigisctl_ask() {
    aigisctl "${@}" 2>/dev/null
}

_aigisctl() {
    local cur prev i cmd="" positionals=0
    local -a config=()
    cur="${COMP_WORDS[COMP_CWORD]}"
    prev="${COMP_WORDS[COMP_CWORD-1]}"
    local commands="call check logs reload restart shell skills start status stop top"

    for ((i = 1; i < COMP_CWORD; i++)); do
        case "${COMP_WORDS[i]}" in
            -c|--config) config=(-c "${COMP_WORDS[i+1]}"); ((i++)) ;;
            -n|--lines|-d|--delay) ((i++)) ;;
            -*) ;;
            *) if [[ -z "$cmd" ]]; then cmd="${COMP_WORDS[i]}"; else ((positionals++)); fi ;;
        esac
    done

    case "$prev" in
        -c|--config) COMPREPLY=($(compgen -f -- "$cur")); return 0 ;;
        -n|--lines|-d|--delay) COMPREPLY=(); return 0 ;;
    esac

    if [[ -z "$cmd" ]]; then
        if [[ "$cur" == -* ]]; then
            COMPREPLY=($(compgen -W "-c --config -h --help --version" -- "$cur"))
        else
            COMPREPLY=($(compgen -W "$commands" -- "$cur"))
        fi
        return 0
    fi

    local opts="" names=""
    case "$cmd" in
        status) opts="--json"; names=plugins ;;
        start|stop|restart) ((positionals == 0)) && names=plugins ;;
        logs) opts="-f --follow -n --lines"; ((positionals == 0)) && names=plugins ;;
        skills) opts="--json" ;;
        call) ((positionals == 0)) && names=skills ;;
        check) opts="-q --quiet" ;;
        top) opts="-d --delay --once" ;;
    esac
    if [[ "$cur" == -* ]]; then
        COMPREPLY=($(compgen -W "$opts -c --config -h --help" -- "$cur"))
    elif [[ -n "$names" ]]; then
        COMPREPLY=($(compgen -W "$(_aigisctl_ask "${config[@]}" _complete "$names")" -- "$cur"))
    fi
    return 0
}

complete -F _aigisctl aigisctl
