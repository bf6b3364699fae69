# Adds the kvc-run harness to a llama.cpp build without touching the llama.cpp tree:
#   cmake ... -DCMAKE_PROJECT_llama.cpp_INCLUDE=<repo>/tests/llama/kvc-run.cmake [-DKVC_RUN_PATCHED=ON]
# The target is defined at the end of the top-level directory, when llama and llama-common exist.
set(KVC_RUN_SOURCE "${CMAKE_CURRENT_LIST_DIR}/kvc-run.cpp")

function(kvc_run_add)
    if (NOT TARGET llama-common)
        message(WARNING "kvc-run: no llama-common target, the harness is not built")
        return()
    endif()
    add_executable(kvc-run ${KVC_RUN_SOURCE})
    target_link_libraries(kvc-run PRIVATE llama-common llama ${CMAKE_THREAD_LIBS_INIT})
    target_compile_features(kvc-run PRIVATE cxx_std_17)
    if (KVC_RUN_PATCHED)
        target_compile_definitions(kvc-run PRIVATE KVC_RUN_PATCHED)
    endif()
    get_filename_component(_kvc_dir "${KVC_RUN_SOURCE}" DIRECTORY)
    if (KVC_RUN_PATCHED AND EXISTS "${_kvc_dir}/../../eval/kvc-eval.cpp") # eval driver (needs the patch)
        add_executable(kvc-eval "${_kvc_dir}/../../eval/kvc-eval.cpp")
        target_link_libraries(kvc-eval PRIVATE llama-common llama ${CMAKE_THREAD_LIBS_INIT})
        target_compile_features(kvc-eval PRIVATE cxx_std_17)
    endif()
endfunction()

cmake_language(DEFER CALL kvc_run_add)
